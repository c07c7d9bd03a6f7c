#!/usr/bin/env bash
# Prepares Triton's perf_analyzer to run on a machine whose glibc is older than its wheel needs, and prints
# the command prefix that runs it (one line: the loader, its library path and the binary).
#
#   bench/perf_analyzer_env.sh [FOLDER]     (default: ${XDG_CACHE_HOME:-~/.cache}/classify-bench/perf_analyzer)
#
# PyPI's perf-analyzer wheel (PERF_ANALYZER_VERSION, default 2.60.0) is tagged manylinux_2_38: it needs
# glibc 2.38, and Debian 12 has 2.36. So its binary runs under Debian 13 (trixie)'s dynamic loader with
# trixie's libc, libstdc++, libgcc, OpenSSL and zlib, fetched with `apt-get download` through an apt
# configuration of its own (its own sources list and state folder: the machine's apt is not touched) and
# unpacked with `dpkg-deb -x` into FOLDER/root. Nothing is installed system-wide and nothing is committed;
# FOLDER is a cache: a second call only prints the prefix. Where the machine's glibc is new enough
# already, the wheel's binary runs as it is.
set -euo pipefail

FOLDER=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/classify-bench/perf_analyzer}
VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
SUITE=${PERF_ANALYZER_SUITE:-trixie}
MIRROR=${PERF_ANALYZER_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(libc6 libstdc++6 libgcc-s1 libssl3t64 zlib1g)
PYTHON=${PYTHON:-python3}

fail() {
    echo "perf_analyzer_env: $*" >&2
    echo "perf_analyzer_env: remove $FOLDER and try again; or run perf_analyzer your own way and give the" \
         "bench its command with --perf-analyzer 'COMMAND'" >&2
    exit 1
}

binary=$FOLDER/wheel/perf_analyzer/bin/perf_analyzer
if [[ ! -x $binary ]]; then
    mkdir -p "$FOLDER"
    tmp=$(mktemp -d "$FOLDER/.wheel.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "perf_analyzer_env: downloading perf-analyzer $VERSION from PyPI..." >&2
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
        "perf-analyzer==$VERSION" -d "$tmp" >&2 \
        || fail "pip could not download perf-analyzer==$VERSION (manylinux_2_38_x86_64) from PyPI"
    "$PYTHON" -m zipfile -e "$tmp"/perf_analyzer-*.whl "$tmp/wheel" || fail "cannot unpack the wheel"
    chmod +x "$tmp/wheel/perf_analyzer/bin/perf_analyzer"
    rm -rf "$FOLDER/wheel"
    mv "$tmp/wheel" "$FOLDER/wheel"  # whole or not at all
fi

glibc=$(getconf GNU_LIBC_VERSION | awk '{print $2}')
if [[ $(printf '%s\n' "$glibc" 2.38 | sort -V | head -1) == 2.38 ]]; then
    echo "$binary"  # glibc $glibc runs it as it is
    exit 0
fi

root=$FOLDER/root
if [[ ! -x $root/lib64/ld-linux-x86-64.so.2 ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
        || fail "glibc $glibc is older than the 2.38 perf_analyzer $VERSION needs, and there is no apt-get/dpkg-deb" \
                "to fetch Debian $SUITE's; run the bench on a machine with glibc >= 2.38"
    keyring=/usr/share/keyrings/debian-archive-$SUITE-stable.gpg
    [[ -f $keyring ]] || fail "no $keyring: install a newer debian-archive-keyring (apt-get install debian-archive-keyring)"
    apt=$(mktemp -d "$FOLDER/.apt.XXXXXX")
    trap 'rm -rf "$apt" "${tmp:-}"' EXIT
    mkdir -p "$apt/state/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$apt/root"
    echo "deb [signed-by=$keyring] $MIRROR $SUITE main" > "$apt/sources.list"
    options=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State=$apt/state"
             -o "Dir::State::status=/dev/null" -o "Dir::Cache=$apt/cache" -o "APT::Architecture=amd64"
             -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
    echo "perf_analyzer_env: fetching Debian $SUITE's ${PACKAGES[*]} with apt-get download..." >&2
    apt-get "${options[@]}" -qq update >&2 || fail "apt-get update of Debian $SUITE ($MIRROR) failed"
    (cd "$apt/debs" && apt-get "${options[@]}" -qq download "${PACKAGES[@]}" >&2) \
        || fail "apt-get download ${PACKAGES[*]} from Debian $SUITE failed"
    for deb in "$apt"/debs/*.deb; do
        dpkg-deb -x "$deb" "$apt/root" || fail "dpkg-deb -x $deb failed"
    done
    # trixie is merged-/usr: its loader is usr/lib64/ld-linux-x86-64.so.2 (lib64 may be a link to it).
    mkdir -p "$apt/root/lib64"
    [[ -e $apt/root/lib64/ld-linux-x86-64.so.2 ]] \
        || ln -sf ../usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$apt/root/lib64/ld-linux-x86-64.so.2"
    rm -rf "$root"
    mv "$apt/root" "$root"
fi

libs=$root/usr/lib/x86_64-linux-gnu
"$root/lib64/ld-linux-x86-64.so.2" --library-path "$libs" "$binary" --version >/dev/null 2>&1 \
    || fail "perf_analyzer does not start under $root's loader: run" \
            "'$root/lib64/ld-linux-x86-64.so.2 --library-path $libs $binary --version' to see why"
echo "$root/lib64/ld-linux-x86-64.so.2 --library-path $libs $binary"
