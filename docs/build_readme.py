"""Splice the workstream sections docs/readme/*.md into README.md between its markers.

The fragments are the source; run `python docs/build_readme.py` after editing one.
"""
import re, pathlib, sys
root = pathlib.Path(__file__).resolve().parents[1]
readme = (root / "README.md").read_text()
start_marker = "<!-- ===================== WORKSTREAM SECTIONS"
start = readme.index(start_marker)
start = readme.index("-->", start) + 3
end_marker = "<!-- ===================== END WORKSTREAM SECTIONS ================= -->"
end = readme.index(end_marker)
order = ["store", "pseudobulk", "planner", "ctmm_api", "ctmm", "ursm", "vae", "mrvi_analysis", "resilience", "kubernetes"]
frags = sorted((root / "docs/readme").glob("*.md"))
names = [f.stem for f in frags]
ordered = [n for n in order if n in names] + [n for n in names if n not in order]
parts = []
for n in ordered:
    text = (root / "docs/readme" / f"{n}.md").read_text().strip()
    parts.append(text)
body = "\n\n".join(parts)
new = readme[:start] + "\n\n" + body + "\n\n" + readme[end:]
(root / "README.md").write_text(new)
print("spliced", ordered)
