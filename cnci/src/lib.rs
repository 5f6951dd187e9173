//! Concentrator dataplane: remote subnets over tunnels, a gateway bridge and dnsmasq per
//! subnet, NAT and floating IPs (see the Architecture section of the README).
