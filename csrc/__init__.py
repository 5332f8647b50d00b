# Installed as the package flashattn_cupy.csrc, so that importlib.resources finds the C and
# CUDA sources in a wheel, an sdist install or an editable checkout alike. No Python here.
