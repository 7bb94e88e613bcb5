#!/usr/bin/env bash
# apt_install PACKAGE...: Debian packages for the test set-up, the one step that needs root.
# As root it runs apt-get directly; otherwise through sudo where sudo exists; otherwise it stops
# with a message naming the packages to install by hand. Recommended packages are not installed
# (gap-doc alone would pull in ~200 MB of GAP libraries that nothing here reads).
apt_install() {
  local run=()
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
      run=(sudo)
      echo "apt: installing $* with sudo (needs root)" >&2
    else
      echo "apt: installing $* needs root and there is no sudo: run this script as root, or install" \
        "$* by hand (apt-get install --no-install-recommends $*), then run it again" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "apt: no apt-get on this machine: install $* by hand, then run this script again" >&2
    return 1
  fi
  "${run[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null ||
    { "${run[@]}" apt-get update -q >/dev/null && "${run[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
}
