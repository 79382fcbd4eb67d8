#!/usr/bin/env bash
# System packages the test suite uses: Chromium for the web-page test, bubblewrap and libseccomp
# for the code-interpreter sandbox. Installed only where missing, only with apt and root; elsewhere
# the tests that need them skip with a message.
set -uo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v bwrap >/dev/null || missing+=(bubblewrap)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]} with apt-get"
    (apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }) ||
        echo "could not install ${missing[*]}; the tests that need them will skip"
else
    echo "not installing ${missing[*]} (needs apt-get and root); the tests that need them will skip"
fi
exit 0
