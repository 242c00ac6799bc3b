package cache_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"

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

// Signed entries: the hosts that build for the cache sign what they
// upload; every host accepts only entries signed by a key it trusts.
func ExampleWithTrustedKeys() {
	// Once, by an operator: granary cache keygen farm-1 farm.sec farm.pub
	// does this and writes the two lines to files.
	k, err := cache.GenerateKey("farm-1", nil)
	if err != nil {
		log.Fatal(err)
	}
	pubLine := k.Public().String() // "farm-1:BASE64", the trusted list entry

	// On a building host: sign uploads.
	up, err := cache.Open("s3://granary-cache/farm1?endpoint=https://s3.example.com", cache.WithSignKey(k))
	if err != nil {
		log.Fatal(err)
	}
	defer up.Close()

	// On every host: trust farm-1 only, and never wait for the cache more
	// than 30 s under a build lock.
	trusted, err := cache.ParsePublicKeys(pubLine)
	if err != nil {
		log.Fatal(err)
	}
	down, err := cache.Open("s3://granary-cache/farm1?endpoint=https://s3.example.com",
		cache.WithTrustedKeys(trusted...), cache.WithFetchBudget(30*time.Second))
	if err != nil {
		log.Fatal(err)
	}
	defer down.Close()
	fmt.Println(trusted[0].Name, down)
	// Output: farm-1 s3://granary-cache/farm1/ at https://s3.example.com
}
