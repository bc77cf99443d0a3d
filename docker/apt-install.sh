# shellcheck shell=bash
# apt_install LABEL PACKAGE...: apt-get install Debian's PACKAGEs that are missing, without starting
# their services (the tests run private daemons: munged, MariaDB, dockerd). A no-op when all are
# installed; prints "LABEL: installed ..." to stderr. Sourced by docker/engine.sh and
# slurm/cluster/start.sh, which may run at the same time (hence the dpkg lock timeout).
apt_install() {
    local label=$1 missing=() p
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        echo "$label: ${missing[*]} not installed, and this is not root on a Debian/Ubuntu machine" >&2
        return 1
    fi
    # Docker images already ship such a policy-rc.d; elsewhere it keeps the packages' services stopped
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((added)); then rm -f "$policy"; fi
    echo "$label: installed ${missing[*]}" >&2
}
