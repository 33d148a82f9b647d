"""Stages of a record's path through spoold from `perf trace` output (issue 14, fsync=always
visibility). Usage: python3 visibility-trace-2026-12-06.py TRACE... (traces written by
visibility-trace-run-2026-12-06.sh). Per append (a pwrite64 of > 1000 bytes into the segment):
the producer connection's last read before it, the first fdatasync of the segment that starts
after it, that sync's length, the first large write to the consumer's connection after it;
then, per fdatasync, whether a pwrite into the same file ran during it."""
import re,sys,bisect,statistics as st,collections
pat=re.compile(r'^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+) (\w+)\(fd: (\d+)(.*?)\)\s+= (-?\d+)')
def q(v,p): v=sorted(v); return v[min(len(v)-1,int(p*len(v)))] if v else float('nan')

def load(f):
    ev=[]; pend={}
    pstart=re.compile(r'^\s*([\d.]+) \(\s*\): (\S+)/(\d+) (\w+)\(fd: (\d+).*\.\.\.\s*$')
    pcont=re.compile(r'^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+)\s+\.\.\. \[continued\]: (\w+)\(.*=\s+(-?\d+)')
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
    ev.sort()
    return ev

def overlap(f, ev):
    seg=collections.Counter(e[4] for e in ev if e[3]=='pwrite64').most_common(1)[0][0]
    syncs=[(e[0],e[0]+e[1]) for e in ev if e[3]=='fdatasync' and e[4]==seg]
    ps=sorted(e[0] for e in ev if e[3]=='pwrite64' and e[4]==seg and e[5]>1000)
    ov=[];no=[]
    for s0,s1 in syncs:
        (ov if bisect.bisect_left(ps,s1)>bisect.bisect_left(ps,s0) else no).append(s1-s0)
    fmt=lambda v:f"n={len(v)} p50 {q(v,.5):.3f} p90 {q(v,.9):.3f} mean {st.mean(v):.3f} ms"
    print(f"   fdatasync with a pwrite into the file during it: {fmt(ov)}; without: {fmt(no)}")
    # Without the bias of the line above (a longer sync catches more appends): the rest of a
    # sync's length after its first 0.15 ms, by whether an append started in that window.
    early=[];late=[]
    for s0,s1 in syncs:
        if s1-s0<0.15: continue
        (early if bisect.bisect_left(ps,s0+0.15)>bisect.bisect_left(ps,s0) else late).append(s1-s0-0.15)
    print(f"   rest after 0.15 ms, an append started in the first 0.15 ms: {fmt(early)}; none: {fmt(late)}")

for f in sys.argv[1:]:
    ev=load(f)
    by=collections.Counter((e[3],e[4]) for e in ev)
    # segment fd: the fd with most pwrite64
    pw=collections.Counter(e[4] for e in ev if e[3]=='pwrite64')
    seg=pw.most_common(1)[0][0]
    # consumer socket: writev fd with the largest total bytes
    wb=collections.Counter()
    for e in ev:
        if e[3] in('writev','write','sendmsg'): wb[e[4]]+=max(e[5],0)
    cons=wb.most_common(1)[0][0]
    syncs=sorted((e[0],e[0]+e[1],e[2]) for e in ev if e[3]=='fdatasync' and e[4]==seg)
    sstarts=[s[0] for s in syncs]
    sends=sorted(e[0] for e in ev if e[3] in('writev','write','sendmsg') and e[4]==cons and e[5]>1000)
    rd=collections.Counter(e[4] for e in ev if e[3] in('read','recvfrom','recvmsg') and e[5]>1000 and e[4]!=cons)
    prod=rd.most_common(1)[0][0] if rd else -1
    reads=sorted(e[0]+e[1] for e in ev if e[3] in('read','recvfrom','recvmsg') and e[4]==prod and e[5]>0)
    R=[]
    A=[];B=[];C=[];T=[]
    for e in ev:
        if e[3]=='pwrite64' and e[4]==seg and e[5]>1000:
            pend=e[0]+e[1]
            i=bisect.bisect_left(sstarts,pend)
            if i>=len(syncs): continue
            s0,s1,_=syncs[i]
            j=bisect.bisect_left(sends,s1)
            if j>=len(sends): continue
            k=bisect.bisect_right(reads,e[0])-1
            if k>=0: R.append(e[0]-reads[k])
            A.append(s0-pend);B.append(s1-s0);C.append(sends[j]-s1);T.append(sends[j]-e[0])
    busy=sum(s[1]-s[0] for s in syncs); span=(ev[-1][0]-ev[0][0])
    thr=collections.Counter(s[2] for s in syncs)
    pwt=collections.Counter(e[2] for e in ev if e[3]=='pwrite64' and e[4]==seg)
    pwd=[e[1] for e in ev if e[3]=='pwrite64' and e[4]==seg]
    print(f"{f}: seg fd {seg}, consumer fd {cons}; {len(syncs)} fdatasyncs busy {busy/span*100:.0f}% (threads {len(thr)}), appends {len(A)}, pwrite threads {len(pwt)}, pwrite p50/p99/max {q(pwd,.5):.3f}/{q(pwd,.99):.3f}/{max(pwd):.3f} ms")
    for n,v in (('last read -> append start',R),('append end -> sync start',A),('sync duration',B),('sync end -> consumer send',C),('append -> consumer send',T)):
        print(f"   {n:28s} p50 {q(v,.5):.3f}  p90 {q(v,.9):.3f}  p99 {q(v,.99):.3f} ms  mean {st.mean(v):.3f}")
    overlap(f, ev)
