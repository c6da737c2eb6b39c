r"""Runs a kswap_jax method from an ml_collections config.

    python run.py                                          # the bundled-digits demo
    python run.py --config=configs/demo.py:method=laf --workdir=/tmp/laf
    python run.py --config=configs/ks_imagenet100.py:learn=cub --config.ks.beta=0.3

Bad input exits with code 2 and one line on stderr; Ctrl-C with code 130 once a checkpoint
save under way has finished. Rerunning the same command resumes from the newest checkpoint
in the workdir. On Linux it restarts itself once with glibc
tunables that keep XLA:CPU's per-step buffers mapped between steps (kswap_jax/hostmem.py;
KSWAP_HOST_MEMORY=retain|hugepages|glibc chooses, the run log's first line says which).
"""

import sys

from kswap_jax import hostmem

if __name__ == "__main__":
  hostmem.reexec_with_tunables()  # before jax: glibc reads its tunables at start-up
  from kswap_jax.cli import exit_program, main
  exit_program(main(sys.argv))
