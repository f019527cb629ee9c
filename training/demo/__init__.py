"""The demo: what `qbridge demo build` needs to make the embedded demo model from nothing, kept apart from
the library (the rest of ``training``) so that the two read apart. Import from the modules themselves:

- ``training.demo.shapes``: the procedural shapes world (scenes, renderer, captions, ``qbridge data``)
- ``training.demo.pretrain``: the demo's frozen LLM and its tokenizer, pretrained on the world's text
- ``training.demo.oracle``: the LLM's oracle gate (the true scene in place of the bridge's tokens)
- ``training.demo.vision``: the demo's vision tower pretraining and its linear probes (the vision gate)
- ``training.demo.build``: the ``qbridge demo build`` pipeline, its gates and ``--install``

The library depends on none of them, except ``training.evaluate``'s scene-grounded caption metrics,
which read shapes-world scenes (``training.demo.shapes``).
"""
