package etcdstore_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// A build farm job: make sure a toolchain exists (built once however many
// hosts ask), hold a reference while using it, release it.
func Example() {
	srv, err := etcdtest.StartServer() // in production: your etcd cluster
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()
	cli, err := srv.NewClient()
	if err != nil {
		log.Fatal(err)
	}
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
	srv, _ := etcdtest.StartServer()
	defer srv.Close()
	cli, _ := srv.NewClient()
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
	srv, _ := etcdtest.StartServer()
	defer srv.Close()
	cli, _ := srv.NewClient()
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
