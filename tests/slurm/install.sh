#!/usr/bin/env bash
# Install SLURM and munge from Debian's packages, for the tests that run the workflow through a
# real single-node cluster (tests/test_slurm.py, started by tests/slurm/cluster.sh).
# Idempotent: does nothing when slurmctld, slurmd, sinfo and munged are already on PATH, and
# refreshes the package lists only when a first install attempt cannot find the packages.
set -euo pipefail

PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)

have_all() {
    # Debian puts the daemons in /usr/sbin, which a non-login root shell may lack on PATH.
    local tool
    for tool in slurmctld slurmd sinfo sbatch squeue scontrol munged mungekey; do
        command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || return 1
    done
}

if have_all; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: SLURM is missing and apt-get is not available; install ${PACKAGES[*]} by hand" >&2
    exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    SUDO=(sudo -n)
fi

export DEBIAN_FRONTEND=noninteractive
install_packages() {
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# A fresh container has empty package lists: try first, refresh the lists only if that fails.
if ! install_packages 2>/dev/null; then
    "${SUDO[@]}" apt-get update -qq >/dev/null
    install_packages
fi

have_all || { echo "install.sh: SLURM packages installed but binaries not found" >&2; exit 1; }
