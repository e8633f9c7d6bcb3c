"""The input forms of the prepare stage: Kaldi data dirs, CSV/JSONL manifests and audio trees.

``address`` (how a manifest names any utterance's samples), ``kaldi_entry`` (pipe and ark entries
through kaldiio), one reader per form (``kaldi_dir``, ``manifest_file``, ``tree``) and ``detect``,
which tells the forms apart from their content. See docs/data.md.
"""
