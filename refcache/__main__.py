import sys

from refcache.cli import main

sys.exit(main())
