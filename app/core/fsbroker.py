"""kombu's filesystem transport, with messages written atomically.

The stock transport creates a message file and then writes it; a consumer polling the folder
can take the file while it is still empty and lose the message (JSONDecodeError). Writing to
a hidden temporary name and renaming it into place makes a message appear whole or not at all.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    # The stubs of kombu's two base classes disagree on this signature; the runtime one is this.
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        # Starts with a dot: `_get` only takes names ending in ".<queue>.msg" after the first dot.
        partial = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(dumps(payload).encode())
            os.replace(partial, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise ChannelError(f"cannot add {name!r} to the queue folder") from exc


class Transport(filesystem.Transport):
    Channel = Channel
