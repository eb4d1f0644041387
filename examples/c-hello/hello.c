/* hello: the smallest enclave program. Prints its arguments and where it runs. */
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char host[64] = "?";
    gethostname(host, sizeof host);
    printf("hello from enclave %s (pid %d)", host, (int)getpid());
    for (int i = 1; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    return 0;
}
