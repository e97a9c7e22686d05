#!/usr/bin/env python3
"""Rewrite a `docker save` archive of every image a kind node needs into the kube-apiserver.tar
of a Kubernetes server tarball, for `kind build node-image --type file` (tools/kind/setup.sh).

kind reads the tags of each image tarball of the server layout from whichever of `manifest.json`
(its first entry only) or `repositories` comes first in the tarball, and pulls every image that
kubeadm and kind's default manifests need but those tags do not name. Nothing can be pulled here,
so the output starts with a `repositories` file naming every image of the archive by its fully
qualified reference (kind compares strings: docker.io/... spelled out), then holds the archive's
other members unchanged (containerd imports from `manifest.json` and ignores `repositories`).

`--declare REF` adds a reference kind requires that is in no tarball: kind's default CNI image
(kindnetd), which cannot be built here. Clusters made from this node image use
networking.disableDefaultCNI and tools/kind/cni.yaml instead, so it is never run, and as
containerd ignores `repositories`, nothing of that name exists in the node.

usage: repack-images.py SAVED.tar OUT.tar [--declare REF]...
"""

import io
import json
import sys
import tarfile


def qualified(reference: str) -> tuple[str, str]:
    """Split `name:tag` and spell the name out as containerd stores it (docker.io/library/...)."""
    name, tag = reference.rsplit(":", 1)
    first, _, rest = name.partition("/")
    if not rest:
        name = f"docker.io/library/{name}"
    elif not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}"
    return name, tag


def add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def repositories(references: dict) -> bytes:
    repos: dict = {}
    for reference, image_id in references.items():
        name, tag = qualified(reference)
        repos.setdefault(name, {})[tag] = image_id
    return json.dumps(repos, sort_keys=True).encode()


def main(argv: list) -> None:
    declared = []
    positional = []
    args = iter(argv)
    for arg in args:
        if arg == "--declare":
            declared.append(next(args))
        else:
            positional.append(arg)
    saved, output = positional

    with tarfile.open(saved) as source:
        references = {}
        for entry in json.load(source.extractfile("manifest.json")):
            image_id = entry["Config"].split("/")[-1].removesuffix(".json")
            for reference in entry.get("RepoTags") or []:
                references[reference] = image_id
        for reference in declared:
            references.setdefault(reference, "")
        with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as out:
            add_bytes(out, "repositories", repositories(references))
            for member in source:
                if member.name != "repositories":
                    out.addfile(member, source.extractfile(member) if member.isfile() else None)


if __name__ == "__main__":
    main(sys.argv[1:])
