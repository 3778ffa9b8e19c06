"""Generation: plain decoding and speculative decoding for recurrent state."""
