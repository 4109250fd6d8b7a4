"""FAISS index build and load: :mod:`.params` (parameters, manifest, directory layout), :mod:`.faiss_util` (index
types, GPU placement), :mod:`.build`, :mod:`.load` and :mod:`.wiki` (the cached Wikipedia index, ``wiki[:type]`` specs)."""
