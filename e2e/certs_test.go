package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
)

// TestWriteCerts checks the certificates the TLS scenario relies on: the
// server's names, client CNs, and that the rogue one does not chain to the CA.
func TestWriteCerts(t *testing.T) {
	dir := t.TempDir()
	if CertsValid(dir) {
		t.Fatal("CertsValid on an empty directory")
	}
	if err := WriteCerts(dir); err != nil {
		t.Fatal(err)
	}
	if !CertsValid(dir) {
		t.Fatal("fresh certificates are not valid")
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CertCA))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("CA does not parse")
	}
	load := func(name string) *x509.Certificate {
		t.Helper()
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		c, err := x509.ParseCertificate(pair.Certificate[0])
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	client := x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	for name, cn := range map[string]string{CertRoot: "root", CertGranary: "granary", CertIntruder: "intruder"} {
		c := load(name)
		if _, err := c.Verify(client); err != nil || c.Subject.CommonName != cn {
			t.Errorf("%s: CN %q, verify %v; want CN %q signed by the CA", name, c.Subject.CommonName, err, cn)
		}
	}
	if _, err := load(CertRogue).Verify(client); err == nil {
		t.Error("the rogue certificate chains to the cluster CA")
	}
	server := load(CertServer)
	for _, host := range []string{"etcd1", "etcd3", "localhost", "127.0.0.1"} {
		opts := x509.VerifyOptions{Roots: pool, DNSName: host}
		if _, err := server.Verify(opts); err != nil {
			t.Errorf("server certificate for %s: %v", host, err)
		}
	}
}
