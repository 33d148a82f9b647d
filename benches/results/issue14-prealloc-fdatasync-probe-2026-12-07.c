// issue 14 (prealloc): 4 KiB pwrite + fdatasync, p50/p90/p99 per mode, in the directory argv[1].
// Modes: append (growing file), prezeroed (overwrites of a file pre-zeroed and synced once),
// falloc-keepsize / falloc-size (fallocate then overwrite), and zero-ahead-<chunk>: the file is
// pre-zeroed in chunks as the writer approaches the zeroed end (a chunk of zeros written and
// fdatasync'd once half of the previous chunk is used), inline on the same thread, so the
// zeroing's cost is charged to the record sync that follows it (the worst case for a record
// that waits behind a zeroing sync). Built by the lead's /tmp/probe/p.c, extended.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
#define N 1000
#define R 5
#define M 7
int main(int c,char**v){
  if(c<2){fprintf(stderr,"usage: %s DIR\n",v[0]);return 2;}
  const char*names[M]={"append","prezeroed","falloc-keepsize","falloc-size","zero-ahead-256KiB","zero-ahead-1MiB","zero-ahead-4MiB"};
  const long chunks[M]={0,0,0,0,256<<10,1<<20,4<<20};
  static double lat[M][N*R]; static double zl[M][N*R]; int zn[M]={0};
  char buf[4096]; memset(buf,0x5a,4096);
  char *z=calloc(1,4<<20);
  for(int r=0;r<R;r++) for(int m=0;m<M;m++){
    char path[256]; sprintf(path,"%s/f%d",v[1],m); unlink(path);
    int fd=open(path,O_CREAT|O_RDWR|O_TRUNC,0644);
    if(fd<0){perror("open");return 1;}
    if(m==1){for(int i=0;i<4;i++) pwrite(fd,z,1<<20,(off_t)i<<20); fdatasync(fd);}
    if(m==2){fallocate(fd,FALLOC_FL_KEEP_SIZE,0,4<<20); fsync(fd);}
    if(m==3){fallocate(fd,0,0,4<<20); fsync(fd);}
    long zend=0;
    if(chunks[m]){pwrite(fd,z,chunks[m],0); fdatasync(fd); zend=chunks[m];}
    for(int i=0;i<N;i++){
      double t=now(); long pos=(long)i*4096;
      if(chunks[m] && zend-pos < chunks[m]/2){
        double tz=now(); pwrite(fd,z,chunks[m],zend); fdatasync(fd); zend+=chunks[m]; zl[m][zn[m]++]=now()-tz;
      }
      pwrite(fd,buf,4096,pos); fdatasync(fd); lat[m][r*N+i]=now()-t;
    }
    close(fd); unlink(path);
  }
  printf("4 KiB pwrite + fdatasync, %d per mode (%d reps x %d), microseconds\n",N*R,R,N);
  for(int m=0;m<M;m++){qsort(lat[m],N*R,sizeof(double),cmp); printf("%-18s p50 %6.0f p90 %6.0f p99 %6.0f max %6.0f",names[m],lat[m][N*R/2],lat[m][N*R*9/10],lat[m][N*R*99/100],lat[m][N*R-1]);
    if(zn[m]){qsort(zl[m],zn[m],sizeof(double),cmp); printf("   zeroing syncs %d: p50 %6.0f max %6.0f",zn[m],zl[m][zn[m]/2],zl[m][zn[m]-1]);}
    printf("\n");}
  return 0;
}
