#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 without reaching an image registry.
#
# The root filesystem is bootstrapped from the Debian mirror this machine's apt is configured with,
# brought up to date with the security and updates suites, given extra CA certificates (for
# TLS-inspecting proxies) and imported with `docker import`. The inputs are hashed into a label;
# a second run with the same inputs finds the image and exits within seconds.
#
# Usage: scripts/build-base-image.sh [--tag TAG] [--ca-bundle FILE] [--packages "a b"] [--force]
# Prints the image tag on the last line of stdout.
set -euo pipefail

TAG="taskdock/base-python:3.11-bookworm"
SUITE="bookworm"
CA_BUNDLE="${TASKDOCK_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PACKAGES="python3 python3-venv ca-certificates debian-archive-keyring"
FORCE=0
LABEL_KEY="org.taskdock.base.inputs"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
log() { printf 'build-base-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --tag) TAG="$2"; shift 2 ;;
        --ca-bundle) CA_BUNDLE="$2"; shift 2 ;;
        --packages) PACKAGES="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done

command -v docker >/dev/null || die "docker client not found"
docker info >/dev/null 2>&1 || die "no Docker engine answers (is dockerd running?)"

# Print "URI SUITE" for every deb source apt is configured with, one-line and deb822 formats alike.
apt_sources() {
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $f ]] || continue
        awk '$1 == "deb" {
                 i = 2
                 if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                 print $i, $(i + 1)
             }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        awk 'function flush() {
                 if (types ~ /(^| )deb( |$)/ && enabled != "no")
                     for (u in uris) for (s in suites) print uris[u], suites[s]
                 delete uris; delete suites; types = ""; enabled = ""
             }
             /^[[:space:]]*#/ { next }
             /^[[:space:]]*$/ { flush(); next }
             {
                 key = tolower($1); sub(/:$/, "", key)
                 if (key == "types") { $1 = ""; types = $0 }
                 else if (key == "enabled") enabled = tolower($2)
                 else if (key == "uris") for (i = 2; i <= NF; i++) uris[i] = $i
                 else if (key == "suites") for (i = 2; i <= NF; i++) suites[i] = $i
             }
             END { flush() }' "$f"
    done
}

SOURCES="$(apt_sources)"
mirror_for() { awk -v s="$1" '$2 == s { print $1; exit }' <<<"$SOURCES"; }
MIRROR="$(mirror_for "$SUITE")"
SECURITY_MIRROR="$(mirror_for "$SUITE-security")"
UPDATES_MIRROR="$(mirror_for "$SUITE-updates")"
[[ -n $MIRROR ]] || die "no apt source for suite '$SUITE' in /etc/apt/sources.list{,.d}"
[[ -r $CA_BUNDLE ]] || die "CA bundle not readable: $CA_BUNDLE"

ARCH="$(dpkg --print-architecture)"
INPUTS_HASH="$(
    {
        sha256sum "$0" | cut -d' ' -f1
        sha256sum "$CA_BUNDLE" | cut -d' ' -f1
        printf '%s\n' "$SUITE" "$ARCH" "$PACKAGES" "$MIRROR" "$SECURITY_MIRROR" "$UPDATES_MIRROR"
    } | sha256sum | cut -c1-16
)"

if [[ $FORCE -eq 0 ]] &&
    [[ "$(docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$TAG" 2>/dev/null)" == "$INPUTS_HASH" ]]; then
    log "up to date: $TAG (inputs $INPUTS_HASH)"
    echo "$TAG"
    exit 0
fi

[[ $EUID -eq 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"

WORK="$(mktemp -d "${TMPDIR:-/var/tmp}/taskdock-base.XXXXXX")"
ROOTFS="$WORK/rootfs"
cleanup() {
    if mountpoint -q "$ROOTFS/proc" 2>/dev/null; then umount "$ROOTFS/proc"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

log "debootstrap $SUITE ($ARCH) with: $PACKAGES"
debootstrap --variant=minbase --arch="$ARCH" --include="${PACKAGES// /,}" \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }

# apt inside the image uses the same mirror as this machine (the debug target and test stand-ins
# install packages from it).
{
    printf 'Types: deb\nURIs: %s\nSuites: %s' "$MIRROR" "$SUITE"
    [[ -n $UPDATES_MIRROR ]] && printf ' %s-updates' "$SUITE"
    printf '\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    if [[ -n $SECURITY_MIRROR ]]; then
        printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$SECURITY_MIRROR" "$SUITE"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
    fi
} >"$ROOTFS/etc/apt/sources.list.d/debian.sources"
rm -f "$ROOTFS/etc/apt/sources.list"

# Keep documentation out of this and every later layer, as Debian's slim images do.
cat >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Acquire::GzipIndexes "true";
EOF

# Certificates in the given bundle that Debian's store lacks (a proxy's CA, a company CA).
split_pem() {
    awk -v dir="$2" '/-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("%s/%05d.pem", dir, n) }
                     f { print > f }
                     /-----END CERTIFICATE-----/ { close(f); f = "" }' "$1"
}
mkdir -p "$WORK/given" "$WORK/debian"
split_pem "$CA_BUNDLE" "$WORK/given"
split_pem "$ROOTFS/etc/ssl/certs/ca-certificates.crt" "$WORK/debian"
declare -A known=()
for pem in "$WORK"/debian/*.pem; do known["$(tr -d ' \r\n' <"$pem" | sha256sum | cut -c1-64)"]=1; done
extra=0
for pem in "$WORK"/given/*.pem; do
    [[ -e $pem ]] || continue
    if [[ -z ${known["$(tr -d ' \r\n' <"$pem" | sha256sum | cut -c1-64)"]:-} ]]; then
        extra=$((extra + 1))
        cp "$pem" "$ROOTFS/usr/local/share/ca-certificates/taskdock-extra-$extra.crt"
    fi
done
log "adding $extra CA certificate(s) from $CA_BUNDLE"

mount -t proc proc "$ROOTFS/proc"
chroot "$ROOTFS" /bin/sh -eu >"$WORK/chroot.log" 2>&1 <<'EOF' ||
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
update-ca-certificates --fresh
apt-get update -q
apt-get -y -q -o Dpkg::Options::=--force-confold upgrade
apt-get clean
EOF
    { tail -n 30 "$WORK/chroot.log" >&2; die "updating the root filesystem failed"; }
umount "$ROOTFS/proc"

rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/log/*.log \
    "$ROOTFS"/var/log/apt/* "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/lintian/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
find "$ROOTFS" -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
: >"$ROOTFS/etc/machine-id"
printf 'nameserver 127.0.0.1\n' >"$ROOTFS/etc/resolv.conf"
printf 'localhost\n' >"$ROOTFS/etc/hostname"

PY_VERSION="$(chroot "$ROOTFS" python3 -c 'import platform; print(platform.python_version())')"
CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "importing $TAG (Python $PY_VERSION)"
tar --numeric-owner --xattrs -C "$ROOTFS" -c . | docker import \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" \
    --change "LABEL $LABEL_KEY=$INPUTS_HASH" \
    --change "LABEL org.opencontainers.image.title=taskdock-base-python" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with Python $PY_VERSION\"" \
    --change "LABEL org.opencontainers.image.created=$CREATED" \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
docker tag "$TAG" "${TAG%%:*}:inputs-$INPUTS_HASH"
log "built $TAG ($(docker image inspect -f '{{ .Size }}' "$TAG") bytes)"
echo "$TAG"
