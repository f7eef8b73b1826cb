"""Model compression: what `kind: compress` does to a registered model (``runners/compress.py`` drives it).

``parent.py``   the registered model being compressed: its train spec, weights and pipeline
``prune.py``    global magnitude pruning (masks, fine-tuned) and structured pruning (units removed)
``quantize.py`` int8 weights for Linear and LSTM layers
``distill.py``  a student trained on the teacher's softened outputs and the labels
``measure.py``  what each version is tagged with: parameters, stored bytes, CPU latency
``hooks.py``    what the training loop asks of a method that fine-tunes (prune, distill)
"""
