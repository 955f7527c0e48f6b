"""Run the kdcache CLI from a checkout: `python cli.py ...` equals `kdcache ...`."""

from kdcache.cli import main

if __name__ == "__main__":
    main()
