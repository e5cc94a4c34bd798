"""Suite-wide settings: one torch thread, and the Hugging Face hub offline (tests never fetch).

The test models are tiny: on a 2-core machine OpenMP threads cost more than they give and make timings
swing with the machine's load, so every test (and every process it launches) uses one thread.
"""

import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import, which comes after this file
torch.set_num_threads(1)
