import sys

from bts.cli import main

sys.exit(main())
