#!/usr/bin/env python3
"""Checks deploy/grafana-dashboard.json: valid JSON in the shape Grafana imports (schemaVersion,
unique panel ids, panels inside the 24-column grid, every query on the templated data source), and
every PromQL query parses (`promtool check rules` on a throw-away file with one recording rule per
query, Grafana's variables replaced by plain values). Usage: check-dashboard.py DASHBOARD PROMTOOL"""
import json
import os
import subprocess
import sys
import tempfile

path, promtool = sys.argv[1], sys.argv[2]
with open(path) as f:
    dash = json.load(f)

errors = []
if not 36 <= dash.get("schemaVersion", 0) <= 41:
    errors.append(f"schemaVersion {dash.get('schemaVersion')} (expected about 39)")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource":
    errors.append("no templated data source variable named 'datasource'")
ids, exprs = set(), []
for panel in dash["panels"]:
    title = panel.get("title", "?")
    if panel["id"] in ids:
        errors.append(f"duplicate panel id {panel['id']} ({title})")
    ids.add(panel["id"])
    pos = panel["gridPos"]
    if pos["x"] < 0 or pos["x"] + pos["w"] > 24 or pos["h"] <= 0:
        errors.append(f"panel {title!r} outside the grid: {pos}")
    if panel["type"] == "row":
        continue
    if not panel.get("targets"):
        errors.append(f"panel {title!r} has no query")
    for t in panel.get("targets", []):
        if t.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"panel {title!r} query {t.get('refId')} not on ${{datasource}}")
        exprs.append((title, t["expr"]))

# One recording rule per query: promtool parses each expression.
subst = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".+"}
rules = []
for i, (title, expr) in enumerate(exprs):
    for k, v in subst.items():
        expr = expr.replace(k, v)
    if "$" in expr.replace("$labels", ""):
        errors.append(f"panel {title!r}: unknown variable in {expr}")
    rules.append({"record": f"dashboard:query_{i}", "expr": expr})
with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
    json.dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f)
try:
    res = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
finally:
    os.unlink(f.name)
if res.returncode != 0:
    errors.append("a dashboard query does not parse:\n" + res.stdout + res.stderr)

if errors:
    print("\n".join(f"{path}: {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"{path}: {len(ids)} panels, {len(exprs)} queries parse")
