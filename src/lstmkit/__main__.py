import sys

from lstmkit.app.cli import main

sys.exit(main())
