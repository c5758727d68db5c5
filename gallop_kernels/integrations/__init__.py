"""Integrations with other libraries, on top of the core (which never imports them).

* `targets` -- which layers train (``target_modules``, PEFT's ``"all-linear"``), for every path;
* `transformers` -- the Hugging Face ``Trainer``: optimizer spec and the phase-one callback;
* `bitsandbytes` -- a sparse fp32 delta on a 4-bit base (layer, phase one, training, I/O).
"""
