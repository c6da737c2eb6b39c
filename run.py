r"""Runs a kswap_jax method from an ml_collections config.

    python run.py                                          # the bundled-digits demo
    python run.py --config=configs/demo.py:method=laf --workdir=/tmp/laf
    python run.py --config=configs/ks_imagenet100.py:learn=cub --config.ks.beta=0.3

Bad input exits with code 2 and one line on stderr. Rerunning the same command resumes
from the newest checkpoint in the workdir.
"""

import sys

from kswap_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv))
