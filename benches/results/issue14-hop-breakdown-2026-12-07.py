"""hop (2026-12-07): a record's path through spoold AND the load generator, from one `perf trace`
of both processes (issue14-hop-breakdown-run-2026-12-07.sh). Per append (a pwritev/pwrite of
> 1000 bytes into the segment, in spoold):
  lg produce write -> spoold read   the last load-generator write on its producer connection
                                    before spoold's read, to that read's end (loopback + spoold's wake)
  spoold read -> append start
  append end -> covering sync start, sync length     (fsync=always only)
  visible -> spoold consumer send   from append end (never) or the covering sync's end (always)
                                    to spoold's first large write to the consumer connection
  spoold consumer send -> lg read   to the end of the load generator's first read of its
                                    consumer connection that ends after that write started
  lg produce write -> lg consumer read   the whole traced path (what the load generator's
                                    "after send" adds its own work to: building and encoding the
                                    batch before the write, decoding after the read)
Usage: issue14-hop-breakdown-2026-12-07.py DIR/NAME ... (NAME.trace, NAME.spoold.tids, NAME.lg.tids)"""
import re,sys,bisect,collections
pat=re.compile(r'^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+) (\w+)\(fd: (\d+)(.*?)\)\s+= (-?\d+)')
pstart=re.compile(r'^\s*([\d.]+) \(\s*\): (\S+)/(\d+) (\w+)\(fd: (\d+).*\.\.\.\s*$')
pcont=re.compile(r'^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+)\s+\.\.\. \[continued\]: (\w+)\(.*=\s+(-?\d+)')
def q(v,p): v=sorted(v); return v[min(len(v)-1,int(p*len(v)))] if v else float('nan')
def load(f):
    ev=[]; pend={}
    for line in open(f):
        m=pat.match(line)
        if m:
            t,d,comm,tid,sc,fd,rest,ret=m.groups(); ev.append((float(t),float(d),int(tid),sc,int(fd),int(ret))); continue
        m=pstart.match(line)
        if m:
            t,comm,tid,sc,fd=m.groups(); pend[int(tid)]=(float(t),sc,int(fd)); continue
        m=pcont.match(line)
        if m:
            t,d,comm,tid,sc,ret=m.groups(); p=pend.pop(int(tid),None)
            if p and p[1]==sc: ev.append((p[0],float(d),int(tid),sc,p[2],int(ret)))
    ev.sort(); return ev
W=('pwritev','pwrite64'); WR=('writev','write','sendmsg','sendto'); RD=('read','recvfrom','recvmsg')
def after(ts,t):
    j=bisect.bisect_left(ts,t); return ts[j] if j<len(ts) else None
def before(ts,t):
    j=bisect.bisect_right(ts,t)-1; return ts[j] if j>=0 else None
for name in sys.argv[1:]:
    ev=load(name+'.trace')
    stids={int(x) for x in open(name+'.spoold.tids').read().split()}
    import os
    ltids={int(x) for x in open(name+'.lg.tids').read().split()} if os.environ.get('TRACE_LG')=='1' else set()
    sp=[e for e in ev if e[2] in stids]; lg=[e for e in ev if e[2] in ltids]
    segc=collections.Counter(e[4] for e in sp if e[3] in W and e[5]>1000)
    seg=segc.most_common(1)[0][0]
    wb=collections.Counter()
    for e in sp:
        if e[3] in WR: wb[e[4]]+=max(e[5],0)
    cons=wb.most_common(1)[0][0]
    rd=collections.Counter()
    for e in sp:
        if e[3] in RD and e[4]!=cons: rd[e[4]]+=max(e[5],0)
    prod=rd.most_common(1)[0][0]
    sc=collections.Counter(e[4] for e in sp if e[3]=='fdatasync')
    sfds={fd for fd,n in sc.items() if n>=200} | {seg}
    syncs=sorted((e[0],e[0]+e[1]) for e in sp if e[3]=='fdatasync' and e[4] in sfds)
    sst=[s[0] for s in syncs]
    sends=sorted(e[0] for e in sp if e[3] in WR and e[4]==cons and e[5]>1000)
    reads=sorted(e[0]+e[1] for e in sp if e[3] in RD and e[4]==prod and e[5]>0)
    # load generator: its producer fd writes the most, its consumer fd reads the most
    lw=collections.Counter(); lr=collections.Counter()
    for e in lg:
        if e[3] in WR: lw[e[4]]+=max(e[5],0)
        if e[3] in RD: lr[e[4]]+=max(e[5],0)
    lprod=lw.most_common(1)[0][0] if lw else -1; lcons=lr.most_common(1)[0][0] if lr else -1
    lwrites=sorted(e[0] for e in lg if e[3] in WR and e[4]==lprod and e[5]>1000)
    lreads=sorted(e[0]+e[1] for e in lg if e[3] in RD and e[4]==lcons and e[5]>0)
    lthreads=collections.Counter(e[2] for e in lg if e[3] in RD and e[4]==lcons)
    S=collections.defaultdict(list)
    apps=[e for e in sp if e[3] in W and e[4]==seg and e[5]>1000]
    for e in apps:
        pend=e[0]+e[1]
        r=before(reads,e[0])
        if r is None: continue
        w=before(lwrites,r)
        if syncs:
            i=bisect.bisect_left(sst,pend)
            if i>=len(syncs): continue
            s0,s1=syncs[i]; vis=s1
            running=any(syncs[k][1]>pend for k in range(max(0,i-4),i))
            S['append end -> covering sync start'].append(s0-pend)
            S['sync length'].append(s1-s0)
            S['  (a sync was running at append end: %)'].append(100.0 if running else 0.0)
        else:
            vis=pend
        s=after(sends,vis)
        if s is None: continue
        lr_=after(lreads,s)
        if ltids and lr_ is None: continue
        if w is not None: S['lg produce write -> spoold read end'].append(r-w)
        S['spoold read end -> append start'].append(e[0]-r)
        S['append length'].append(e[1])
        S['visible -> spoold consumer send'].append(s-vis)
        if lr_ is not None: S['spoold consumer send -> lg read end'].append(lr_-s)
        S['spoold read end -> spoold consumer send'].append(s-r)
        if w is not None and lr_ is not None: S['lg produce write -> lg consumer read end'].append(lr_-w)
    span=ev[-1][0]-ev[0][0]
    print(f"{name}: {len(apps)} appends, {len(syncs)} fdatasyncs, span {span/1000:.1f}s; spoold fds seg {seg} prod {prod} cons {cons}; lg fds prod {lprod} cons {lcons}, consumer reads on threads {dict(lthreads)}")
    for n,v in S.items():
        if n.startswith('  ('): print(f"   {n:42s} {sum(v)/len(v):.0f} %"); continue
        print(f"   {n:42s} n={len(v):6d} p50 {q(v,.5):.3f} p90 {q(v,.9):.3f} p99 {q(v,.99):.3f} max {max(v):.3f} ms")
    print("   lg:", open(name+'.lg.log').read().strip().splitlines()[-1][:300])
