"""Breakdown of a record's path through spoold under fsync=always from `perf trace` output
(trace-run.sh). Per append (a pwritev of > 1000 bytes into the segment): producer read before it,
append end -> start of the first fdatasync of the segment that starts after it (the sync that makes it
visible), that sync's length, sync end -> the first large write to the consumer's connection after it.
Split by whether a sync was running when the append ended (the record then waits for two syncs)."""
import re,sys,bisect,statistics as st,collections
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
W=('pwritev','pwrite64')
for f in sys.argv[1:]:
    ev=load(f)
    seg=collections.Counter(e[4] for e in ev if e[3] in W and e[5]>1000).most_common(1)[0][0]
    wb=collections.Counter()
    for e in ev:
        if e[3] in('writev','write','sendmsg'): wb[e[4]]+=max(e[5],0)
    cons=wb.most_common(1)[0][0]
    sc=collections.Counter(e[4] for e in ev if e[3]=='fdatasync')
    sfds={fd for fd,n in sc.items() if n>=200} | {seg}
    syncs=sorted((e[0],e[0]+e[1],e[2]) for e in ev if e[3]=='fdatasync' and e[4] in sfds)
    sst=[s[0] for s in syncs]; send=[s[1] for s in syncs]
    sends=sorted(e[0] for e in ev if e[3] in('writev','write','sendmsg') and e[4]==cons and e[5]>1000)
    rd=collections.Counter(e[4] for e in ev if e[3] in('read','recvfrom','recvmsg') and e[5]>1000 and e[4]!=cons)
    prod=rd.most_common(1)[0][0] if rd else -1
    reads=sorted(e[0]+e[1] for e in ev if e[3] in('read','recvfrom','recvmsg') and e[4]==prod and e[5]>0)
    S=collections.defaultdict(list)
    apps=[e for e in ev if e[3] in W and e[4]==seg and e[5]>1000]
    for e in apps:
        pend=e[0]+e[1]
        i=bisect.bisect_left(sst,pend)
        if i>=len(syncs): continue
        s0,s1,_=syncs[i]
        j=bisect.bisect_left(sends,s1)
        if j>=len(sends): continue
        # a sync running at append end: started before, ends after
        running=any(syncs[k][1]>pend for k in range(max(0,i-4),i))
        kind='2 syncs' if running else '1 sync '
        r=bisect.bisect_right(reads,e[0])-1
        if r>=0: S['read -> append start'].append(e[0]-reads[r])
        S['append length'].append(e[1])
        S['append end -> sync start'].append(s0-pend)
        S[f'  ({kind}) append end -> sync start'].append(s0-pend)
        S['sync length'].append(s1-s0)
        S['sync end -> consumer send'].append(sends[j]-s1)
        S['append end -> consumer send'].append(sends[j]-pend)
        S[f'  ({kind}) append end -> consumer send'].append(sends[j]-pend)
        if r>=0: S['read -> consumer send'].append(sends[j]-reads[r])
    span=ev[-1][0]-ev[0][0]; busy=sum(s[1]-s[0] for s in syncs)
    gaps=[syncs[i+1][0]-syncs[i][1] for i in range(len(syncs)-1)]
    print(f"{f}: sync fds {sorted(sfds)}; {len(apps)} appends, {len(syncs)} fdatasyncs (busy {busy/span*100:.0f}%, {len(set(s[2] for s in syncs))} threads), span {span/1000:.1f}s")
    print(f"   gap sync end -> next sync start: p50 {q(gaps,.5):.3f} p90 {q(gaps,.9):.3f}")
    for n,v in S.items():
        print(f"   {n:40s} n={len(v):6d} p50 {q(v,.5):.3f} p90 {q(v,.9):.3f} p99 {q(v,.99):.3f} max {max(v):.3f} ms")
