// Command e2eimage builds the container image that docker-compose.yml and
// the e2e tests run: granary, the etcd server and busybox, FROM scratch.
//
// Run it from the repository root:
//
//	go run ./e2e/cmd/e2eimage [-tag granary-e2e:dev] [-certs DIR]
//	go run ./e2e/cmd/e2eimage -no-image -certs DIR -enable-auth https://127.0.0.1:PORT
//
// -certs also writes a CA, server and client certificates for the TLS
// variant (docker-compose.tls.yml) into DIR (unless valid ones are there).
// -enable-auth then turns on etcd auth with those certificates: user root
// administers, user granary (the workers' CN) may use the /granary/ prefix.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/granary-build/granary/e2e"
	"github.com/granary-build/granary/etcdstore"
)

func main() {
	tag := flag.String("tag", e2e.DefaultImage, "image tag")
	certs := flag.String("certs", "", "write TLS certificates for docker-compose.tls.yml into this directory (kept if present)")
	noImage := flag.Bool("no-image", false, "do not build the image")
	auth := flag.String("enable-auth", "", "enable etcd auth at this endpoint, with the certificates of -certs")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *tag, *certs, *auth, !*noImage); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func run(ctx context.Context, tag, certs, auth string, image bool) error {
	if image {
		wd, err := os.Getwd()
		if err != nil {
			return err
		}
		if err := e2e.BuildImage(ctx, wd, tag, os.Stderr); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "e2e image: built", tag)
	}
	if certs != "" {
		if e2e.CertsValid(certs) {
			fmt.Fprintln(os.Stderr, "e2e certs: keeping those in", certs)
		} else if err := e2e.WriteCerts(certs); err != nil {
			return err
		} else {
			fmt.Fprintln(os.Stderr, "e2e certs: written to", certs)
		}
	}
	if auth != "" {
		if certs == "" {
			return fmt.Errorf("-enable-auth needs -certs")
		}
		if err := e2e.EnableAuth(ctx, auth, certs, etcdstore.DefaultPrefix); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "e2e auth: enabled at", auth)
	}
	return nil
}
