"""MkDocs hooks (mkdocs.yml): the docs show bench/results/*.png where `make bench` writes them."""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the benchmark charts as `bench/results/<name>.png`, so pages link them unchanged."""
    root = Path(config.config_file_path).parent
    for chart in sorted((root / "bench" / "results").glob("*.png")):
        files.append(
            File(
                f"bench/results/{chart.name}",
                src_dir=str(root),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files
