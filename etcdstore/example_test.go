package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

// A build farm job: make sure a toolchain exists (built once however many
// hosts ask), hold a reference while using it, release it.
func Example() {
	// In production: your etcd cluster's endpoints. Here: a single-member
	// etcd inside this process, as the granary CLI's local node runs.
	state, _ := os.MkdirTemp("", "granary-etcd") // host-local, short (a unix socket lives here)
	defer os.RemoveAll(state)
	etcd, err := node.StartEmbedded(context.Background(), state)
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		log.Fatal(err)
	}
	defer cli.Close()
	root, _ := os.MkdirTemp("", "granary-example") // in production: the NFS mount
	defer os.RemoveAll(root)

	store, err := etcdstore.New(context.Background(), cli, root)
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()

	pkg := store.Get("toolchain-1.2.3")
	err = pkg.Build(func() error {
		// Runs only if no host has built it yet.
		return os.WriteFile(filepath.Join(pkg.OutputDirectory(), "cc"), []byte("#!/bin/sh\n"), 0o755)
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := pkg.IncRef(); err != nil { // nobody can remove it now
		log.Fatal(err)
	}
	fmt.Println(filepath.Base(filepath.Dir(pkg.OutputDirectory())))
	ok, _ := pkg.TryRemove()
	fmt.Println("removed while in use:", ok)
	pkg.DecRef()
	ok, _ = pkg.TryRemove()
	fmt.Println("removed when unused:", ok)
	// Output:
	// toolchain-1.2.3
	// removed while in use: false
	// removed when unused: true
}

// Follow another host's build, or your own, with the event hook.
func ExampleWithEvents() {
	state, _ := os.MkdirTemp("", "granary-etcd")
	defer os.RemoveAll(state)
	etcd, err := node.StartEmbedded(context.Background(), state) // in production: your etcd cluster
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	cli, _ := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint}})
	defer cli.Close()
	root, _ := os.MkdirTemp("", "granary-example")
	defer os.RemoveAll(root)

	store, err := etcdstore.New(context.Background(), cli, root, etcdstore.WithEvents(func(e etcdstore.Event) {
		switch e.Kind {
		case etcdstore.EventWaiting:
			fmt.Printf("waiting for %s: building on %s (pid %d) since %s\n", e.ID, e.Host, e.PID, e.Since)
		case etcdstore.EventBuilding, etcdstore.EventPublished:
			fmt.Println(e.Kind, e.ID)
		}
	}))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	store.Handle("sdk-7").BuildContext(context.Background(), func(ctx context.Context) error { return nil })
	// Output:
	// building sdk-7
	// published sdk-7
}

// Prune packages unused for longer than OlderThan (here: any, and without
// the grace period that protects fresh packages): what a job holds a
// reference to is kept. TargetBytes prunes by size instead.
func ExampleStore_Prune() {
	state, _ := os.MkdirTemp("", "granary-etcd")
	defer os.RemoveAll(state)
	etcd, err := node.StartEmbedded(context.Background(), state) // in production: your etcd cluster
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	cli, _ := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint}})
	defer cli.Close()
	root, _ := os.MkdirTemp("", "granary-example")
	defer os.RemoveAll(root)
	store, _ := etcdstore.New(context.Background(), cli, root)
	defer store.Close()

	for _, id := range []string{"held", "free"} {
		h := store.Handle(id)
		h.Build(func() error {
			return os.WriteFile(filepath.Join(h.OutputDirectory(), "f"), []byte(id), 0o644)
		})
	}
	store.Handle("held").IncRef() // a job is using it

	rep, err := store.Prune(context.Background(), etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1})
	if err != nil {
		log.Fatal(err)
	}
	for _, p := range rep.Removed {
		fmt.Printf("removed %s (%d bytes)\n", p.ID, p.Size)
	}
	fmt.Println("kept, in use:", rep.InUse)
	// Output:
	// removed free (4 bytes)
	// kept, in use: [held]
}

// A failed attempt is remembered after its builder is gone (for a day by
// default), with the logs it wrote; the next attempt keeps them.
func ExampleStore_LastFailure() {
	state, _ := os.MkdirTemp("", "granary-etcd")
	defer os.RemoveAll(state)
	etcd, err := node.StartEmbedded(context.Background(), state) // in production: your etcd cluster
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	cli, _ := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint}})
	defer cli.Close()
	root, _ := os.MkdirTemp("", "granary-example")
	defer os.RemoveAll(root)
	store, _ := etcdstore.New(context.Background(), cli, root, etcdstore.WithHost("host-a"))
	defer store.Close()

	h := store.Handle("sdk-8")
	h.Build(func() error {
		os.WriteFile(filepath.Join(h.LoggingDirectory(), "build.log"), []byte("cc: not found\n"), 0o644)
		return errors.New("compiler missing")
	})
	fr, err := store.LastFailure(context.Background(), "sdk-8")
	if err != nil || fr == nil {
		log.Fatal("no failure record: ", err)
	}
	fmt.Printf("failed on %s: %s; logs: %s\n", fr.Host, fr.Error, filepath.Base(fr.Logs[0]))
	// Output:
	// failed on host-a: compiler missing; logs: build.log
}

// Replay what the cluster did from a revision (0: follow from now), as
// `granary events` does: each event names its revision, so a watcher that
// stops can resume after the last one it saw.
func ExampleStore_WatchCluster() {
	state, _ := os.MkdirTemp("", "granary-etcd")
	defer os.RemoveAll(state)
	etcd, err := node.StartEmbedded(context.Background(), state) // in production: your etcd cluster
	if err != nil {
		log.Fatal(err)
	}
	defer etcd.Close()
	cli, _ := clientv3.New(clientv3.Config{Endpoints: []string{etcd.Endpoint}})
	defer cli.Close()
	root, _ := os.MkdirTemp("", "granary-example")
	defer os.RemoveAll(root)
	store, _ := etcdstore.New(context.Background(), cli, root, etcdstore.WithHost("host-a"))
	defer store.Close()

	store.Handle("sdk-9").Build(func() error { return nil })

	errSeen := errors.New("seen enough")
	err = store.WatchCluster(context.Background(), 1, nil, func(ev etcdstore.ClusterEvent) error {
		fmt.Println(ev.Kind, ev.ID, ev.Host)
		if ev.Kind == etcdstore.ClusterPublished {
			return errSeen // a live watcher would carry on
		}
		return nil
	})
	if !errors.Is(err, errSeen) {
		log.Fatal(err)
	}
	// Output:
	// building sdk-9 host-a
	// published sdk-9 host-a
}
