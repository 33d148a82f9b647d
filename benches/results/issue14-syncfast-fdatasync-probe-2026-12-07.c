// Probe: do concurrent fdatasync calls on one file overlap on this disk?
// Modes: bare (4 KiB pwrite + fdatasync loop), serial (an appender writes `size` bytes every
// `gap_us`; one syncer runs syncs back to back while appends are unsynced: a record waits for the
// running sync and its own), conc K (each append hands a sync to one of K threads at once, so a
// sync starts right behind each append while others run). Per append: append end -> end of the
// first sync that started after it. Prints p50/p90/p99/max in us.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
#include <stdatomic.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
static void pr(const char*name,double*v,int n){qsort(v,n,sizeof *v,cmp);printf("%-10s n=%6d p50 %7.0f p90 %7.0f p99 %7.0f max %7.0f us\n",name,n,v[n/2],v[n*9/10],v[n*99/100],v[n-1]);}
#define MAXA 200000
static int fd; static size_t size=5120; static int gap=110; static double dur=3e6;
static double a_end[MAXA]; static double a_lat[MAXA]; static atomic_int na;
// sync records: start,end
static pthread_mutex_t mu=PTHREAD_MUTEX_INITIALIZER; static pthread_cond_t cv=PTHREAD_COND_INITIALIZER;
static int requested=0, synced=0; static int stop=0; static int K=1; static int mode=0;
static int queue_n=0; // conc: pending sync requests
static atomic_int inflight, maxin;
static double s_dur[MAXA]; static atomic_int ns;
static void do_sync(int upto){ // sync covering appends < upto (captured before start)
  double t0=now(); int c=atomic_fetch_add(&inflight,1)+1; int m=atomic_load(&maxin); if(c>m) atomic_store(&maxin,c);
  fdatasync(fd); double t1=now(); atomic_fetch_sub(&inflight,1);
  int i=atomic_fetch_add(&ns,1); if(i<MAXA) s_dur[i]=t1-t0;
  pthread_mutex_lock(&mu);
  for(int j=synced;j<upto;j++) if(a_lat[j]==0) a_lat[j]=t1-a_end[j];
  // with concurrency, a later-starting sync may finish first; mark only its own range
  if(upto>synced) synced=upto;
  pthread_mutex_unlock(&mu);
}
static void* syncer(void*x){
  pthread_mutex_lock(&mu);
  while(!stop){
    if(mode==0){ if(requested>synced){int u=requested;pthread_mutex_unlock(&mu);do_sync(u);pthread_mutex_lock(&mu);continue;} }
    else { if(queue_n>0){queue_n--;int u=requested;pthread_mutex_unlock(&mu);do_sync(u);pthread_mutex_lock(&mu);continue;} }
    pthread_cond_wait(&cv,&mu);
  }
  pthread_mutex_unlock(&mu); return 0;
}
int main(int argc,char**argv){
  const char*dir=argv[1]; const char*m=argv[2]; if(argc>3)K=atoi(argv[3]); if(argc>4)gap=atoi(argv[4]); if(argc>5)size=atoi(argv[5]);
  char p[512]; snprintf(p,sizeof p,"%s/probe.%d",dir,getpid()); fd=open(p,O_CREAT|O_RDWR|O_TRUNC,0644); unlink(p);
  char*buf=malloc(1<<20); memset(buf,'x',1<<20); off_t off=0;
  if(argc>6){ long mb=atol(argv[6]); char*z=calloc(1,1<<20); for(long i=0;i<mb;i++) pwrite(fd,z,1<<20,i<<20); fsync(fd); fprintf(stderr,"prefilled %ld MiB\n",mb);}
  if(!strcmp(m,"bare")){ int n=0; static double v[MAXA]; double t_end=now()+dur; while(now()<t_end&&n<MAXA){ pwrite(fd,buf,4096,off); off+=4096; double t0=now(); fdatasync(fd); v[n++]=now()-t0;} pr(argc>6?"barepre":"bare",v,n); return 0;}
  mode=!strcmp(m,"conc"); if(!mode) K=1;
  pthread_t th[16]; for(int i=0;i<K;i++) pthread_create(&th[i],0,syncer,0);
  double t_start=now(), next=t_start; int n=0;
  while(now()<t_start+dur && n<MAXA){
    {double w=next-now(); if(w>0){struct timespec ts={0,(long)(w*1000)}; nanosleep(&ts,0);}}
    pwrite(fd,buf,size,off); off+=size; double e=now();
    pthread_mutex_lock(&mu); a_end[n]=e; n++; requested=n; if(mode) queue_n++; pthread_cond_signal(&cv); pthread_mutex_unlock(&mu);
    next+=gap; if(next<now()) next=now();
  }
  // drain
  for(;;){pthread_mutex_lock(&mu);int done=synced>=n;pthread_mutex_unlock(&mu);if(done)break;usleep(1000);}
  pthread_mutex_lock(&mu); stop=1; pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu);
  for(int i=0;i<K;i++) pthread_join(th[i],0);
  char name[32]; snprintf(name,sizeof name,"%s%d%s",m,K,argc>6?"pre":""); pr(name,a_lat,n);
  int s=atomic_load(&ns); snprintf(name,sizeof name,"  syncs"); pr(name,s_dur,s<MAXA?s:MAXA); printf("  max in flight %d, syncs %d, appends %d\n",atomic_load(&maxin),s,n);
}
