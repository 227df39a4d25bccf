"""instructkit: turn a pretrained base language model into an instruction-following assistant, and prove that it did."""

__version__ = "0.1.0"
