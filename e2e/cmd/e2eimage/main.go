// Command e2eimage builds the container image that docker-compose.yml and
// the e2e tests run: granary, the etcd server and busybox, FROM scratch.
//
// Run it from the repository root:
//
//	go run ./e2e/cmd/e2eimage [-tag granary-e2e:dev] [-certs DIR]
//
// -certs also writes a CA, server and client certificates for the TLS
// variant (docker-compose.tls.yml) into DIR.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/granary-build/granary/e2e"
)

func main() {
	tag := flag.String("tag", e2e.DefaultImage, "image tag")
	certs := flag.String("certs", "", "also write TLS certificates for docker-compose.tls.yml into this directory")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	wd, err := os.Getwd()
	if err == nil {
		err = e2e.BuildImage(ctx, wd, *tag, os.Stderr)
	}
	if err == nil && *certs != "" {
		err = e2e.WriteCerts(*certs)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Fprintln(os.Stderr, "e2e image: built", *tag)
}
