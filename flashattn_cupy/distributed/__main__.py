"""python -m flashattn_cupy.distributed --nproc N script.py [args]: see launch.py."""
import sys

from .launch import main

sys.exit(main())
