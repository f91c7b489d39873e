"""Memory and cost of full-size programs, compiled on abstract shapes (memory.py: the programs'
per-device memory and the CLI; costs.py: bytes, flops and predicted step times of one call)."""
