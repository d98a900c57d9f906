#!/usr/bin/env bash
# Install the Debian packages that tests/cluster/slurm.py needs for a real local SLURM cluster.
#
# Usage:
#   bash tests/cluster/install_slurm.sh            # as root; idempotent (no-op when installed)
#   SLURM_WITH_PMIX=1 bash tests/cluster/install_slurm.sh   # also libpmix-dev for `srun --mpi=pmix`
#
# Only installs; it starts no daemon (Debian's postinst prints "policy-rc.d denied": expected, the
# harness starts slurmctld/slurmd/munged itself). MPI comes from the venv's PyPI `mpich` wheel, whose
# ranks use `srun --mpi=pmi2`, so libpmix-dev is not needed by default.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge)
if [[ "${SLURM_WITH_PMIX:-0}" == "1" ]]; then
    packages+=(libpmix-dev)
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done

if (( ${#missing[@]} == 0 )); then
    echo "install_slurm: already installed: ${packages[*]}"
    exit 0
fi

if [[ "$(id -u)" != "0" ]]; then
    echo "install_slurm: need root to install: ${missing[*]}" >&2
    exit 1
fi

echo "install_slurm: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
