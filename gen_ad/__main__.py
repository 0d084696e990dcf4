"""``python -m gen_ad``: the ``gen-ad`` command line (:func:`gen_ad.cli.main`)."""

import sys

from gen_ad.cli import main

if __name__ == "__main__":
    sys.exit(main())
