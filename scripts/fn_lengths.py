#!/usr/bin/env python3
"""Production functions over LIMIT lines (default 60) under src/, by brace counting; skips
#[cfg(test)] items, tests/ dirs, *tests.rs and pgzip_probe.rs. Exits 1 when there is one.

    scripts/fn_lengths.py [SRC_DIR] [LIMIT]
"""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else 'src'
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 60
fn_re = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"[^"]*"\s+)?fn\s+(\w+)')
def strip(line):
    # drop strings, chars and // comments crudely
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    i = line.find('//')
    return line if i < 0 else line[:i]
out = []
for dp, dn, fn in os.walk(root):
    if '/tests' in dp + '/' and dp.endswith('tests') or '/tests/' in dp + '/':
        continue
    for f in fn:
        if not f.endswith('.rs') or f.endswith('tests.rs') or f == 'pgzip_probe.rs':
            continue
        p = os.path.join(dp, f)
        lines = open(p).read().split('\n')
        i = 0; skip_depth = None; depth = 0; pending_test = False
        stack = []  # (name, start_line, depth_at_open)
        for n, raw in enumerate(lines, 1):
            s = strip(raw)
            if re.match(r'\s*#\[cfg\(test\)\]', raw) or re.match(r'\s*#\[cfg\(all\(test', raw):
                pending_test = True
            m = fn_re.match(s)
            if m and skip_depth is None:
                stack.append([m.group(7), n, depth, False])
            for ch in s:
                if ch == '{':
                    depth += 1
                    if pending_test and skip_depth is None:
                        skip_depth = depth
                        pending_test = False
                    for e in stack:
                        if e[2] == depth - 1 and not e[3]:
                            e[3] = True
                elif ch == '}':
                    if skip_depth is not None and depth == skip_depth:
                        skip_depth = None
                    depth -= 1
                    while stack and stack[-1][3] and stack[-1][2] == depth:
                        name, start, _, _ = stack.pop()
                        out.append((n - start + 1, p, start, name))
                elif ch == ';':
                    # fn declaration without body (trait)
                    if stack and not stack[-1][3] and stack[-1][2] == depth:
                        stack.pop()
            if pending_test and s.strip() and not s.strip().startswith('#') and '{' not in s and s.strip().endswith(';'):
                pending_test = False
out.sort(reverse=True)
over = [o for o in out if o[0] > limit]
for l, p, s, name in over:
    print(f'{l:4d} {p}:{s} {name}')
sys.exit(1 if over else 0)
