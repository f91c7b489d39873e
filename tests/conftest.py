import os
import sys

# Tests import their shared fixtures (decoding_fixtures) as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))
