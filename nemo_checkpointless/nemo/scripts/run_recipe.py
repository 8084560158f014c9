"""Each rank's entry for a recipe started by ``ncl-launch`` (the NeMo-Run launcher's too):
``run_recipe.py [-n NAME] [-p PACKAGER] RECIPE`` with RECIPE NeMo-Run's serialized form (a
string or a file) or ``module:function``. See :mod:`nemo_checkpointless.nemo.run`."""

import sys

if __name__ == "__main__":
    from nemo_checkpointless.nemo.run import main

    sys.exit(main(sys.argv[1:]))
