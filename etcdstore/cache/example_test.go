package cache_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// A store that checks the remote cache before building and fills it after
// publishing.
func ExampleOpen() {
	ctx := context.Background()
	rc, err := cache.Open("https://cache.example.com/granary/", cache.WithBearerToken(os.Getenv("GRANARY_CACHE_TOKEN")))
	if err != nil {
		log.Fatal(err)
	}
	defer rc.Close() // after the store: Store.Close waits for its uploads

	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"etcd1:2379"}})
	if err != nil {
		log.Fatal(err)
	}
	defer cli.Close()
	store, err := etcdstore.New(ctx, cli, "/mnt/granary", etcdstore.WithCache(rc))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	// Build fetches from the cache under the build lock if it can, and
	// runs the builder only otherwise.
	_ = store.Handle("toolchain-1.2.3").BuildContext(ctx, func(ctx context.Context) error { return nil })
}

// Pack a tree and unpack it elsewhere: the digest survives the trip.
func ExamplePack() {
	src, _ := os.MkdirTemp("", "src")
	dst, _ := os.MkdirTemp("", "dst")
	defer os.RemoveAll(src)
	defer os.RemoveAll(dst)
	os.WriteFile(filepath.Join(src, "hello"), []byte("hi\n"), 0o755)
	os.Symlink("hello", filepath.Join(src, "hi"))

	var archive bytes.Buffer
	packed, err := cache.Pack(&archive, src)
	if err != nil {
		log.Fatal(err)
	}
	if _, err := cache.Unpack(&archive, dst, cache.DefaultLimits()); err != nil {
		log.Fatal(err)
	}
	a, _, _ := etcdstore.TreeDigest(src)
	b, _, _ := etcdstore.TreeDigest(dst)
	fmt.Println(packed.Entries, "entries,", packed.Bytes, "bytes; same digest:", a == b)
	// Output: 2 entries, 3 bytes; same digest: true
}
