"""Run in a guest: capture the kernel facts the function catalog resolves against, as unit test
fixtures (tests/fixtures/functions/<kernel>/): the HVO-related lines of /proc/kallsyms and, from the
kernel's BTF, the prototypes of those functions and the struct layout the handlers use.

    python tests/vm_guest_scripts/capture_function_facts.py OUTDIR
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from observer.kernel.btf import Btf

RELEVANT = re.compile(
    r"vmemmap|huge_page|hugetlb|update_and_free|demote|dissolve|alloc_fresh|only_alloc|alloc_pool_huge"
)
STRUCTS = {
    "page": ["private", "flags", "compound_head", "compound_order", "lru"],
    "folio": ["private", "lru", "_folio_order", "_flags_1", "flags"],
    "hstate": ["order", "demote_order", "name"],
}
ENUMS = [("hugetlb_page_flags", "HPG_vmemmap_optimized")]


def main(out: Path) -> int:
    lines = []
    for line in Path("/proc/kallsyms").read_text().splitlines():
        parts = line.split()
        # built-in symbols only (module ones have a 4th column); no __ksymtab_/__kstrtab_ entries
        if len(parts) == 3 and RELEVANT.search(parts[2]) and not parts[2].startswith("__k"):
            lines.append(line)
    btf = Btf.load()
    funcs = sorted({re.sub(r"\..*", "", ln.split()[2]) for ln in lines if ln.split()[1] in "tTwW"})
    facts: dict[str, object] = {"release": os.uname().release, "funcs": {}, "structs": {}, "enums": {}}
    for f in funcs:
        params = btf.func_params(f)
        if params is not None:
            facts["funcs"][f] = {"params": params, "ret": btf.func_return(f)}  # type: ignore[index]
    for s, members in STRUCTS.items():
        facts["structs"][s] = {  # type: ignore[index]
            "size": btf.struct_size(s), "members": {m: btf.member_offset(s, m) for m in members}
        }
    for enum, member in ENUMS:
        facts["enums"][f"{enum}.{member}"] = btf.enum_value(enum, member)  # type: ignore[index]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kallsyms").write_text("".join(f"{ln}\n" for ln in lines))
    (out / "btf.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"{len(lines)} symbols, {len(facts['funcs'])} functions in BTF")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
