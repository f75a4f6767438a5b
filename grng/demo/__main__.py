import sys

from grng.demo.cli import main

sys.exit(main())
