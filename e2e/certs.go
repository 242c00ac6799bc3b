package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Certificate files WriteCerts makes, relative to its directory. Each
// NAME.pem has its key in NAME-key.pem.
const (
	CertCA       = "ca.pem"       // the cluster's CA
	CertServer   = "server"       // etcd members: etcd1..3, localhost, 127.0.0.1
	CertRoot     = "root"         // CN=root: the etcd administrator
	CertGranary  = "granary"      // CN=granary: the workers' etcd user
	CertIntruder = "intruder"     // CN=intruder: signed by the CA, no etcd user
	CertRogue    = "rogue"        // CN=granary, signed by another CA
	CertRogueCA  = "rogue-ca.pem" // that other CA
)

// WriteCerts writes a CA and the certificates above into dir, with Go's
// crypto packages (no openssl needed). Keys are ECDSA P-256; certificates
// are valid for a day.
func WriteCerts(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ca, err := newCA("granary e2e CA")
	if err != nil {
		return err
	}
	rogue, err := newCA("rogue CA")
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, CertCA), "CERTIFICATE", ca.der); err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, CertRogueCA), "CERTIFICATE", rogue.der); err != nil {
		return err
	}
	leaves := []struct {
		name, cn string
		by       *authority
		server   bool
	}{
		{CertServer, "etcd", ca, true},
		{CertRoot, "root", ca, false},
		{CertGranary, "granary", ca, false},
		{CertIntruder, "intruder", ca, false},
		{CertRogue, "granary", rogue, false},
	}
	for _, l := range leaves {
		if err := l.by.issue(dir, l.name, l.cn, l.server); err != nil {
			return err
		}
	}
	return nil
}

// CertsValid reports whether dir holds a CA from WriteCerts that is valid
// for at least another hour (the certificates last a day).
func CertsValid(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, CertCA))
	if err != nil {
		return false
	}
	block, _ := pem.Decode(b)
	if block == nil {
		return false
	}
	c, err := x509.ParseCertificate(block.Bytes)
	return err == nil && time.Until(c.NotAfter) > time.Hour
}

type authority struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

var serial int64 = time.Now().UnixNano()

func template(cn string) *x509.Certificate {
	serial++
	return &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"granary e2e"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
}

func newCA(cn string) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	t := template(cn)
	t.IsCA, t.BasicConstraintsValid = true, true
	t.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, t, t, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &authority{cert: cert, key: key, der: der}, nil
}

// issue writes name.pem and name-key.pem. Server certificates serve both
// ends (etcd uses its certificate as a client towards its peers).
func (a *authority) issue(dir, name, cn string, server bool) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	t := template(cn)
	t.KeyUsage = x509.KeyUsageDigitalSignature
	t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if server {
		t.ExtKeyUsage = append(t.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		t.DNSNames = []string{"etcd1", "etcd2", "etcd3", "localhost"}
		t.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, t, a.cert, &key.PublicKey, a.key)
	if err != nil {
		return fmt.Errorf("e2e certs: %s: %w", name, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEM(filepath.Join(dir, name+".pem"), "CERTIFICATE", der); err != nil {
		return err
	}
	return writePEM(filepath.Join(dir, name+"-key.pem"), "EC PRIVATE KEY", kder)
}

// writePEM writes one block. Keys are world-readable on purpose: they are
// throw-away test keys, bind-mounted into containers that run as root.
func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o644)
}
