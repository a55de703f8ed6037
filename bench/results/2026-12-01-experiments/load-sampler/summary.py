import json,sys
L=sys.argv[1]
d=[json.loads(l) for l in open(f'./load.{L}.json') if l.startswith('{')][-1]
a={l.split()[0]:l.split() for l in open(f'./cpu0.{L}')}
b={l.split()[0]:l.split() for l in open(f'./cpu1.{L}')}
out=[]
for p in sorted(b):
    if p in a:
        u=(int(b[p][1])-int(a[p][1]))/10; s=(int(b[p][2])-int(a[p][2]))/10
        name=b[p][3].split('/')[-1]; 
        if 'worker' in ' '.join(b[p]): name+='-w'
        out.append(f"{name} {u+s:.0f}%")
s0=list(map(int,open(f'./st0.{L}').read().split()[1:])); s1=list(map(int,open(f'./st1.{L}').read().split()[1:]))
dd=[y-x for x,y in zip(s0,s1)]
print(L, d['errors_total'], 'p99', d['latency']['p99_ms'], 'gw us/msg', d['gateway']['cpu_us_per_msg'], '|', ', '.join(out), '| idle %.1f%%'%(100*dd[3]/sum(dd)))
