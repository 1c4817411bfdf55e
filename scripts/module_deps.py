#!/usr/bin/env python3
"""Cycles between src/'s top-level modules: a module uses another when its production files (not
#[cfg(test)] modules, tests/ dirs or *tests.rs) name `crate::other`. `-v` lists every edge.

    scripts/module_deps.py [-v]
"""
import os, re, sys, itertools
root='src'
mods={}
def unit(path):
    rel=os.path.relpath(path,root)
    top=rel.split('/')[0]
    return top[:-3] if top.endswith('.rs') else top
def strip_tests(t):
    out=[];skip=0;depth=0;pending=False
    for line in t.split('\n'):
        if re.match(r'\s*#\[cfg\((all\()?test',line): pending=True; continue
        if pending and skip==0:
            if '{' in line: skip=1; depth=line.count('{')-line.count('}'); pending=False; 
            else: pending=False
            if skip and depth<=0: skip=0
            continue
        if skip:
            depth+=line.count('{')-line.count('}')
            if depth<=0: skip=0
            continue
        out.append(line)
    return '\n'.join(out)
edges={}
for dp,dn,fn in os.walk(root):
    if 'tests' in dp.split('/'): continue
    for f in fn:
        if not f.endswith('.rs') or f.endswith('tests.rs') or f in ('main.rs','pgzip_probe.rs'): continue
        p=os.path.join(dp,f); u=unit(p)
        if u=='lib': continue
        t=strip_tests(open(p).read())
        t=re.sub(r'//.*','',t)
        for m in re.finditer(r'crate::(\w+)',t):
            v=m.group(1)
            if v!=u: edges.setdefault(u,set()).add(v)
        # `use crate::{a, b::c}` groups
        for m in re.finditer(r'crate::\{([^}]*)\}',t):
            for v in re.findall(r'(?:^|,)\s*(\w+)',m.group(1)):
                if v!=u: edges.setdefault(u,set()).add(v)
# SCCs (Tarjan)
idx={};low={};st=[];on=set();sccs=[];c=[0]
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        sccs.append(comp)
sys.setrecursionlimit(10000)
for v in list(edges):
    if v not in idx: sc(v)
for comp in sccs:
    if len(comp)>1:
        print('cycle:', sorted(comp))
        for a in sorted(comp):
            print('  ',a,'->',sorted(set(edges.get(a,()))&set(comp)))
if '-v' in sys.argv:
    for a in sorted(edges): print(a,'->',sorted(edges[a]))
