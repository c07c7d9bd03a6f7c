import gc
import sys

from retrain.cli import main

code = main()
# The interpreter's last garbage collection walks every object TensorFlow and Keras
# made, about a second for nothing at exit: freezing them skips that walk.
gc.freeze()
sys.exit(code)
