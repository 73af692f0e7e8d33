"""
Stage 3: fine-tune the tokenizer's decoder on tokens sampled from the generator's top-K
(HiTokSR; SPEC.md section 3). Not implemented yet: this stub only says so.
"""
import sys

sys.exit("finetune_decoder.py: stage 3 is not implemented yet (see README.md, 'Status').")
